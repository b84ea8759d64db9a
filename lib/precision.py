"""ONE precision policy for training, validation, ``predict``/``evaluate``, the MONAI Label tasks and the benches.

Settings (``HParams.precision``, ``--precision``):

* ``"auto"`` (default): bf16 autocast only where bf16 is known to be fast, else fp32.
  - CPU: PyTorch's kernels must dispatch to AVX-512 (``torch.backends.cpu.get_cpu_capability()`` starts with
    ``AVX512``) *and* the processor must have native bf16 arithmetic (AVX512-BF16 or AMX). On an AVX2-only CPU a
    32-channel conv block ran 36x slower under bf16 autocast than in fp32 (1878 ms vs 52 ms), so AVX2 gets fp32.
    ``ATEN_CPU_CAPABILITY=avx2`` makes a bf16-capable machine behave (and decide) like an AVX2 one.
  - CUDA: bf16 where the GPU supports it (Ampere and newer), else fp32 (fp16 autocast is never chosen silently).
* ``"fp32"``: no autocast. ``"bf16"`` / ``"fp16"``: forced (fp16 only on CUDA).

Nothing else in the code base calls ``torch.autocast``: every caller goes through :func:`autocast`.
"""

from __future__ import annotations

import contextlib
import threading
import functools

import torch

from .config import ConfigError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_LEGACY = {"none": "fp32", "bf16": "auto", None: None}  # the old train.autocast values (see HParams.resolved)


class PrecisionError(ConfigError):
    """An unknown or unusable precision setting."""


def check(setting: str) -> str:
    if setting not in PRECISIONS:
        raise PrecisionError(f"precision must be one of {PRECISIONS}, got {setting!r}")
    return setting


@functools.lru_cache(maxsize=None)
def _cpu_native_bf16() -> bool:
    cpu = getattr(torch, "cpu", None)
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        fn = getattr(cpu, probe, None)
        try:
            if fn is not None and fn():
                return True
        except Exception:  # noqa: BLE001 - an old torch without the probe: assume no native bf16
            pass
    return False


def cpu_bf16_is_fast() -> bool:
    """AVX-512 dispatch and native bf16 arithmetic (AVX512-BF16 or AMX)."""
    return torch.backends.cpu.get_cpu_capability().upper().startswith("AVX512") and _cpu_native_bf16()


def resolve(setting: str, device: str | torch.device) -> torch.dtype:
    """The compute dtype the policy picks for ``device``: float32, bfloat16 or float16."""
    check(setting)
    dev = torch.device(device)
    if setting == "fp32":
        return torch.float32
    if setting == "fp16":
        if dev.type != "cuda":
            raise PrecisionError("precision 'fp16' is only supported on CUDA; use 'bf16', 'fp32' or 'auto'")
        return torch.float16
    if setting == "bf16":
        return torch.bfloat16
    if dev.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if dev.type == "cpu":
        return torch.bfloat16 if cpu_bf16_is_fast() else torch.float32
    return torch.float32


def recorded(setting: str, device: str | torch.device) -> str:
    """What a training on ``device`` records: the precision ``setting`` resolves to there ("fp32", "bf16", "fp16"),
    never "auto" (an "auto" record would let an fp32-trained model run in bf16 on another machine)."""
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(resolve(setting, device), "fp32")


def served(record: str, device: str | torch.device) -> str:
    """The setting a loaded checkpoint runs in on ``device``, from the precision its training recorded.

    Training resolves ``auto`` and records what it ran in. An fp32-trained model stays in fp32 everywhere (bf16
    inference cost an fp32-trained cxr model 0.20 Dice). A model trained in bf16 (or fp16) runs in that precision
    where the hardware does it fast, and in fp32 elsewhere: its weights are fp32, reduced precision was only a
    speed choice of the training machine, and on an AVX2-only CPU bf16 autocast is 13-36x slower than fp32 (a
    sample checkpoint trained on an AVX512-BF16 CPU, served in bf16 on an AVX2 CI machine, did not finish its
    tests in 90 minutes). An explicit request, ``--precision`` or ``precision=`` still forces any setting."""
    check(record)
    dev = torch.device(device)
    if record == "auto":  # a checkpoint that does not say what it trained in (e.g. published by the MONAI Label
        return "fp32"     # trainer before 2026-12-06): fp32, which every model runs in (auto could pick bf16)
    if record == "bf16":
        return "bf16" if resolve("auto", dev) == torch.bfloat16 else "fp32"
    if record == "fp16":
        return "fp16" if dev.type == "cuda" else "fp32"
    return record


def autocast(setting: str, device: str | torch.device):
    """The autocast context of the policy (a null context for fp32)."""
    dev = torch.device(device)
    dtype = resolve(setting, dev)
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=dev.type, dtype=dtype)


_flags_lock = threading.Lock()
_flags_depth = 0
_flags_saved: tuple | None = None


@contextlib.contextmanager
def reproducible():
    """Prediction on CUDA without TF32 and with deterministic cuDNN algorithms (restored afterwards).

    PyTorch's defaults (TF32 convolutions on Ampere and later, cuDNN free to pick an algorithm per batch shape) let
    a window's logits depend on the other windows of its batch (up to 1.4e-3 on an H200), which the sampler's
    Bernoulli draws amplify: with the same seed, ``sw_batch_size`` 1 and 8 gave probabilities 0.045 apart
    (bench/cuda_checks.py). Inside this context they agree to 2.4e-7; the cost, timed once side by side on the
    H200, was within the noise of one call (0.096 vs 0.097 s 2D, 0.325 vs 0.321 s 3D). The flags only act on
    CUDA (setting them costs nothing elsewhere). They are process-wide: predictions in several threads share one
    setting, made by the first to enter and restored by the last to leave (each saving and restoring its own let
    the first to leave turn TF32 back on under the other, and the last leave it off for good). A concurrent CUDA
    training in the same process runs without TF32 while a prediction is in flight (slower, never wrong).
    """
    global _flags_depth, _flags_saved
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    with _flags_lock:
        if _flags_depth == 0:
            _flags_saved = (cudnn.allow_tf32, cudnn.deterministic, cudnn.benchmark, matmul.allow_tf32)
            cudnn.allow_tf32, cudnn.deterministic, cudnn.benchmark, matmul.allow_tf32 = False, True, False, False
        _flags_depth += 1
    try:
        yield
    finally:
        with _flags_lock:
            _flags_depth -= 1
            if _flags_depth == 0:
                cudnn.allow_tf32, cudnn.deterministic, cudnn.benchmark, matmul.allow_tf32 = _flags_saved
                _flags_saved = None


def describe(setting: str = "auto", device: str | torch.device = "cpu") -> dict:
    """What the policy sees and picks (printed by the benches with every figure)."""
    info = {"precision_setting": setting, "device": str(device), "dtype": str(resolve(setting, device)),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu_native_bf16": _cpu_native_bf16(),
            "torch": torch.__version__, "threads": torch.get_num_threads()}
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def default_device() -> str:
    """CUDA when present (as MONAI Label's own tasks default), else the CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"
