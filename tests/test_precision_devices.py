"""One precision policy (training, validation, evaluate, the app) that follows the hardware; default devices."""

from __future__ import annotations

import pytest
import torch

import lib.precision as precision
from lib.config import ConfigError, HParams, TrainConfig


@pytest.mark.parametrize("capability,native,expected", [
    ("AVX2", True, torch.float32),      # AVX2 dispatch: bf16 autocast ran 36x slower than fp32 there
    ("AVX512", False, torch.float32),   # AVX-512 without native bf16 arithmetic
    ("AVX512", True, torch.bfloat16),   # AVX512-BF16 / AMX
    ("DEFAULT", False, torch.float32),
])
def test_auto_picks_bf16_only_where_the_cpu_does_it_fast(monkeypatch, capability, native, expected):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr(precision, "_cpu_native_bf16", lambda: native)
    assert precision.resolve("auto", "cpu") == expected
    assert precision.resolve("fp32", "cpu") == torch.float32 and precision.resolve("bf16", "cpu") == torch.bfloat16
    with torch.no_grad(), precision.autocast("auto", "cpu"):
        y = torch.nn.Linear(4, 4)(torch.rand(2, 4))
    assert y.dtype == expected


def test_bad_settings_are_refused_and_legacy_autocast_maps_onto_the_policy():
    with pytest.raises(ConfigError, match="only supported on CUDA"):
        precision.resolve("fp16", "cpu")
    with pytest.raises(ConfigError, match="precision must be one of"):
        precision.check("float8")
    with pytest.raises(ConfigError, match="precision must be one of"):
        HParams(precision="half").resolved()
    # before the policy, presets said train.autocast "bf16" (meaning: bf16 for speed) or "none" (fp32)
    assert HParams(train=TrainConfig(autocast="bf16")).resolved().precision == "auto"
    assert HParams(train=TrainConfig(autocast="none")).resolved().precision == "fp32"
    assert HParams().resolved().precision == "auto"


def test_training_and_prediction_use_the_same_policy(monkeypatch, make_system):
    """train_loss (both trainers) and predict_windows (validation, evaluate, the app, scoring) autocast through
    lib.precision with the checkpoint's setting -- one policy."""
    from lib.data import random_patch_batch
    from lib.inferer import DFMSlidingWindowInferer
    from lib.training import train_loss
    from monai.data import MetaTensor

    system = make_system()
    system.hparams.precision = "bf16"
    calls = []
    real = precision.autocast
    monkeypatch.setattr(precision, "autocast", lambda s, d: calls.append((s, str(d))) or real(s, d))
    label = torch.zeros(1, 48, 48)
    label[:, 10:30, 10:30] = 1
    batch = random_patch_batch([{"image": MetaTensor(torch.rand(1, 48, 48)), "label": label}],
                               system.hparams.preprocessing, num_patches=2)
    train_loss(system, batch, "cpu")
    DFMSlidingWindowInferer([32, 32], steps=2)(torch.rand(1, 1, 40, 40), system)
    assert calls and calls[0] == ("bf16", "cpu") and all(c == ("bf16", "cpu") for c in calls), calls
    assert len(calls) >= 2


def test_default_device_is_cuda_when_present(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert precision.default_device() == "cuda"
    from lib.infers.dfm_vlm import DFMVLMInfer

    assert DFMVLMInfer._device(DFMVLMInfer.__new__(DFMVLMInfer), {}) == "cuda"
    assert DFMVLMInfer._device(DFMVLMInfer.__new__(DFMVLMInfer), {"device": "cpu"}) == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert precision.default_device() == "cpu"


@pytest.mark.parametrize("gpus", [1, 2])
def test_a_device_named_as_3d_slicer_sends_it_runs_there(monkeypatch, gpus):
    """3D Slicer sends the task's ``device`` option as MONAI Label lists it: on a GPU machine the GPU's *name*
    (found by a review: the name was not "cuda...", so every Slicer request ran on the CPU of a GPU server)."""
    from monailabel.utils.others.generic import device_list

    from lib.infers.dfm_vlm import DFMVLMInfer, request_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "NVIDIA H100 80GB HBM3")
    names = device_list()  # what the task's config lists and Slicer sends back, e.g. ['NVIDIA H100 80GB HBM3']
    assert len(names) == gpus and "cpu" not in names
    want = ["cuda"] if gpus == 1 else [f"cuda:{i}" for i in range(gpus)]
    assert [request_device(n, "cuda") for n in names] == want
    task = DFMVLMInfer.__new__(DFMVLMInfer)
    assert DFMVLMInfer._device(task, {"device": [names[-1]]}) == want[-1]  # Slicer sends a one-element list
    assert request_device(None, "cuda") == request_device("", "cuda") == "cuda"
    assert request_device("cpu", "cuda") == "cpu" and request_device("cuda:0", "cpu") == "cuda:0"
    for bad in ("tpu", f"cuda:{gpus}", "NVIDIA A100"):  # never a silent fall-back to the CPU
        with pytest.raises(ConfigError, match=f"'device' '{bad}' is not a device of this server"):
            request_device(bad, "cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert request_device("cuda", "cpu") == "cpu"  # as MONAI Label's name_to_device


def test_the_predictor_runs_without_tf32_and_with_deterministic_cudnn_then_restores(make_system):
    """On CUDA, TF32 and cuDNN's per-batch-shape algorithm choice made the same seed give probabilities 0.045 apart
    for sw_batch_size 1 vs 8 (bench/results/gpu_h200/cuda_checks_before.json); the predictor turns both off while
    the network runs (the flags only act on CUDA, so their state is observable here) and restores the caller's."""
    from lib.inferer import DFMSlidingWindowInferer

    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    saved = (cudnn.allow_tf32, cudnn.deterministic, cudnn.benchmark, matmul.allow_tf32)
    system = make_system()
    seen = []
    hook = system.model.register_forward_hook(
        lambda *_: seen.append((cudnn.allow_tf32, cudnn.deterministic, cudnn.benchmark, matmul.allow_tf32)))
    try:
        cudnn.allow_tf32, cudnn.deterministic, cudnn.benchmark, matmul.allow_tf32 = True, False, True, True
        DFMSlidingWindowInferer([32, 32], steps=2)(torch.rand(1, 1, 40, 40), system)
        after = (cudnn.allow_tf32, cudnn.deterministic, cudnn.benchmark, matmul.allow_tf32)
    finally:
        hook.remove()
        cudnn.allow_tf32, cudnn.deterministic, cudnn.benchmark, matmul.allow_tf32 = saved
    assert seen and all(s == (False, True, False, False) for s in seen), seen
    assert after == (True, False, True, True)


@pytest.mark.parametrize("capability,native,recorded,expected", [
    ("AVX2", True, "bf16", "fp32"),     # trained on an AVX512-BF16 CPU, served on an AVX2 one: fp32 (13-36x faster)
    ("AVX512", True, "bf16", "bf16"),   # where bf16 is fast, the precision it was trained in
    ("AVX512", True, "fp32", "fp32"),   # an fp32-trained model never runs in bf16 by default (it costs Dice)
    ("AVX2", True, "fp16", "fp32"),     # fp16 exists only on CUDA
])
def test_a_checkpoint_runs_in_its_training_precision_where_that_is_fast(monkeypatch, tmp_path, make_system,
                                                                        capability, native, recorded, expected):
    """load_system (the app, predict/evaluate, the MONAI Label trainer's fine-tuning) serves a checkpoint in the
    precision its training recorded only where the hardware does it fast; a request can still force one."""
    from lib.checkpoint import load_system, save_checkpoint
    from lib.inferer import DFMSlidingWindowInferer

    system = make_system()
    system.hparams.precision = recorded
    save_checkpoint(tmp_path / "m.pt", system.model, system.hparams)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr(precision, "_cpu_native_bf16", lambda: native)
    loaded = load_system(tmp_path / "m.pt")
    assert loaded.hparams.precision == expected
    calls = []
    real = precision.autocast
    monkeypatch.setattr(precision, "autocast", lambda s, d: calls.append(s) or real(s, d))
    DFMSlidingWindowInferer([32, 32], steps=1)(torch.rand(1, 1, 32, 32), loaded)
    DFMSlidingWindowInferer([32, 32], steps=1, precision="bf16")(torch.rand(1, 1, 32, 32), loaded)
    assert calls == [expected, "bf16"], calls


def test_a_checkpoint_that_records_auto_is_served_in_fp32():
    """A review: ``auto`` records (the MONAI Label trainer published them before 2026-12-06) were served as ``auto``,
    i.e. bf16 on a bf16 CPU, whatever the model was trained in (bf16 inference cost an fp32-trained model 0.20
    Dice). Unknown training precision: fp32, which every model runs in."""
    from lib.precision import served

    assert served("auto", "cpu") == "fp32"
    assert served("fp32", "cpu") == "fp32"


def test_a_config_file_without_precision_gets_the_default_and_a_checkpoint_fp32():
    """A review: every JSON config read through ``HParams.from_dict`` without a ``precision`` got fp32 (a
    checkpoint's fallback), not the documented default ``auto``; the legacy ``train.autocast: "bf16"`` then became
    fp32 instead of ``auto``. Checkpoints without a precision still load as fp32 (what they were validated in)."""
    from lib.checkpoint import resolve_hparams
    from lib.config import HParams

    assert HParams.from_dict({}).precision == "auto" == HParams().precision
    assert HParams.from_dict({"train": {"autocast": "bf16"}}).precision == "auto"
    assert HParams.from_dict({"train": {"autocast": "none"}}).precision == "fp32"
    raw = HParams().to_dict()
    raw.pop("precision")
    assert resolve_hparams(raw, {}).precision == "fp32"


def test_a_thread_told_to_use_one_cpu_thread_makes_no_openmp_team_and_leaves_the_others_theirs():
    """The server's threads other than the models' one run torch operators in themselves alone (lib.threads): a
    second OpenMP team in the process made every inference about 25 % slower."""
    from lib.threads import in_a_passing_thread

    before = torch.get_num_threads()
    if before < 2:
        pytest.skip("one CPU thread here: nothing to tell apart")

    def work():
        torch.ones(2 ** 22).sum()  # a parallel operator
        return torch.get_num_threads()

    assert in_a_passing_thread(work) == 1
    assert torch.get_num_threads() == before and work() == before
    with pytest.raises(ZeroDivisionError):
        in_a_passing_thread(lambda: 1 / 0)
