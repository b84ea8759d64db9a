"""Training loop whose validation IS the test path.

Each iteration: a few preprocessed images -> :class:`lib.data.PatchBatcher` (random patches, positive/negative
centres) -> :func:`lib.vlm.patch_condition` on every patch -> ``t`` and ``x_t`` per patch ->
``BCEWithLogits(model(x_t, t, cond), x1)`` (:func:`lib.flow.training_step`).

Validation calls :func:`lib.evaluation.evaluate_items` -- the sliding-window sampler on whole validation images,
thresholded and scored in the labels' original geometry -- the very function ``python -m lib evaluate`` calls. The
checkpoint with the best validation Dice is kept (``best.pt``), with the last one (``last.pt``).
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
import re
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from monai.data import CacheDataset
from torch.optim.swa_utils import AveragedModel

from .checkpoint import atomic_torch_save, atomic_write, remove_interrupted_writes, save_checkpoint
from .clicks import Clicks, guidance_maps, hold_maps, next_click, random_clicks
from .config import DIST_TIMEOUT_MIN, ConfigError, HParams, check_train
from .data import PatchBatcher
from .evaluation import check_labels, evaluate_items, make_inferer
from .flow import training_step
from .inferer import DFMSystem
from .samplers import ItemNoise, derive_seed
from .network import ConditionalUNet
from . import precision as precision_policy
from .transforms import label_item
from .vlm import VLMEncoder, fingerprint_mismatch, patch_texts

logger = logging.getLogger(__name__)


def build_system(hp: HParams, device: str | torch.device = "cpu") -> DFMSystem:
    """A fresh (untrained) system from hyper-parameters: loads the VLM and fills in its embedding sizes."""
    vlm = None
    if hp.model.mode == "dfm" and hp.vlm.name_or_path:
        vlm = VLMEncoder.from_pretrained(hp.vlm, device=device)
        hp.vlm = vlm.resolved_config()
    hp = hp.resolved()
    if vlm is not None:
        vlm.cfg = hp.vlm  # resolved: the view's axis codes
    model = ConditionalUNet(hp.model).to(device)
    return DFMSystem(model, vlm, hp).to(device).eval()


def simulated_clicks(system: DFMSystem, image: torch.Tensor, x1: torch.Tensor, texts, rng: np.random.Generator,
                     item_rngs: Sequence[np.random.Generator] | None = None) -> list[Clicks]:
    """Clicks of a training batch, as DeepEdit trains: a share ``clicks.no_click_prob`` of patches gets none (the
    automatic mode); in an iteration with corrective clicks (probability ``clicks.corrective_prob``) each other patch
    starts from random clicks or none, then 1..``corrective_rounds`` rounds of: predict with the clicks so far
    (:meth:`DFMSystem.predict_windows`, one Euler step -- the predictor every caller uses), click the centre of the
    largest error region (:func:`lib.clicks.next_click`); otherwise each gets random clicks
    (:func:`lib.clicks.random_clicks`).

    ``rng`` draws what the whole batch shares (corrective or not, how many rounds); ``item_rngs`` (one per patch;
    default: ``rng``) what each patch draws, so that a patch's clicks do not depend on the other patches of its batch
    (the training loop keys them by seed, iteration and slot: the same clicks whatever the number of ranks)."""
    cc = system.hparams.clicks
    b, spatial = image.shape[0], tuple(image.shape[2:])
    item_rngs = list(item_rngs) if item_rngs is not None else [rng] * b
    if len(item_rngs) != b:
        raise ValueError(f"simulated_clicks: {len(item_rngs)} item streams for a batch of {b}")
    truth = x1.detach().cpu().numpy()[:, 0] > 0.5
    corrective = cc.corrective_rounds > 0 and rng.random() < cc.corrective_prob
    rounds = int(rng.integers(1, cc.corrective_rounds + 1)) if corrective else 0
    clicks, active = [], []
    for i in range(b):
        if item_rngs[i].random() < cc.no_click_prob:
            clicks.append(Clicks())
            continue
        active.append(i)
        start_random = (not corrective) or item_rngs[i].random() < 0.5
        clicks.append(random_clicks(truth[i], item_rngs[i], cc.max_random) if start_random else Clicks())
    if corrective and active:
        act_texts = None if texts is None else [texts[i] for i in active]

        def predict(g, h):
            mean, _ = system.predict_windows(
                image[active], act_texts, [int(item_rngs[i].integers(0, 2 ** 62)) for i in active],
                sampler="euler", steps=1, num_samples=1, guidance=g, hold=h)
            return mean[:, 0].cpu().numpy() > 0.5

        refs = [None] * len(active)
        if cc.grow_radius >= 0 and cc.grow_scale > 0:  # the fills follow the automatic result, as in the app
            none = torch.zeros((len(active), 2, *spatial), device=image.device)
            refs = list(predict(none, none))
        for _ in range(rounds):
            g = torch.stack([guidance_maps(clicks[i], spatial, cc.sigma) for i in active])
            h = torch.stack([hold_maps(clicks[i], spatial, cc.hold_radius, image=image[i], grow_radius=cc.grow_radius,
                                       grow_tolerance=cc.grow_tolerance, grow_side=cc.grow_side,
                                       grow_channels=cc.grow_channels, grow_scale=cc.grow_scale, reference=ref)
                             for i, ref in zip(active, refs)]) if (cc.hold_radius >= 0 or cc.grow_radius >= 0) else None
            pred = predict(g, h)
            for j, i in enumerate(active):
                c = next_click(pred[j], truth[i])
                if c is not None:
                    clicks[i].add(*c)
    return clicks


def train_loss(system: DFMSystem, batch: dict, device, generator: torch.Generator | None = None,
               network: torch.nn.Module | None = None, rng: np.random.Generator | None = None,
               info: dict | None = None, item_rngs: Sequence[np.random.Generator] | None = None) -> torch.Tensor:
    """The loss of one patch batch: per-patch VLM conditioning, ``t`` and ``x_t`` per patch, BCE on ``x1``.

    Shared by this loop and the MONAI Label trainer. ``batch``: ``image``, ``label`` and ``items`` (the source entry
    of every patch, for its text). ``network``: the module to run (e.g. DDP-wrapped ``system.model``). A
    click-trained model (``clicks.enabled``) gets the guidance maps of :func:`simulated_clicks` (``rng``,
    ``item_rngs``).
    ``info``: see :func:`lib.flow.training_step` (each patch's ``t`` and BCE).
    """
    hp = system.hparams
    image = batch["image"].to(device).float()
    x1 = batch["label"].to(device).float()
    # a prompted model: each patch's text is the prompt drawn with its structure (lib.structures.RandStructured)
    texts = batch.get("texts") or (patch_texts(batch["items"], hp.vlm) if system.vlm is not None else None)
    guidance = None
    if system.takes_clicks:
        rng = rng if rng is not None else np.random.default_rng()
        clicks = simulated_clicks(system, image, x1, texts, rng, item_rngs)
        guidance = torch.stack([guidance_maps(c, image.shape[2:], hp.clicks.sigma) for c in clicks]).to(device)
    with precision_policy.autocast(hp.precision, device):  # the policy prediction uses (lib.precision)
        cond = system.condition(image, texts, guidance)
        return training_step(network or system.model, cond, x1, hp.flow, generator, dfm=system.model.dfm, info=info)


STATE_FORMAT = "dfm-vlm-train-state"
_LOSS_ROW = re.compile(r"(\d+),([^,]+)")  # one whole row of losses.csv


class TrainingDiverged(ConfigError):
    """The training loss became NaN or infinite."""


class ResumeError(ConfigError):
    """A training state that cannot be resumed here (CLI: exit 2 with the reason)."""


class HardImageSampler:
    """Which training images make each batch: uniformly (``share`` 0, the default: the very draw of
    ``np_rng.choice(n, size, replace=False)``), or more often the images the model currently gets wrong
    (``train.hard_share`` > 0; image-level hard-example mining).

    An image's *difficulty* is a moving average (``decay``) of its patches' BCE, each divided by the running mean
    BCE of all patches drawn at a similar flow time ``t`` (``bins`` bins of [0, 1]): the BCE of a patch depends
    mostly on ``t`` (how many voxels ``x_t`` already reveals), so the raw loss would favour the images that happened
    to draw a small ``t``. Images not drawn yet keep difficulty 1 (the average). Draw probabilities:
    ``(1 - share) / n + share * difficulty / sum(difficulty)``, without replacement within a batch.
    """

    def __init__(self, n: int, share: float = 0.0, decay: float = 0.5, bins: int = 8, bin_decay: float = 0.99):
        if not 0.0 <= share <= 1.0:
            raise ConfigError(f"train.hard_share must be within [0, 1], got {share}")
        if not 0.0 <= decay < 1.0:
            raise ConfigError(f"train.hard_decay must be within [0, 1), got {decay}")
        self.n, self.share, self.decay, self.bin_decay = int(n), float(share), float(decay), float(bin_decay)
        self.difficulty = np.ones(self.n, dtype=np.float64)
        self.bin_mean = np.full(int(bins), np.nan, dtype=np.float64)

    def probabilities(self) -> np.ndarray:
        d = np.maximum(self.difficulty, 1e-6)
        return (1.0 - self.share) / self.n + self.share * d / d.sum()

    def draw(self, rng: np.random.Generator, size: int) -> np.ndarray:
        if self.share == 0.0:
            return rng.choice(self.n, size=size, replace=False)
        return rng.choice(self.n, size=size, replace=False, p=self.probabilities())

    def update(self, images: Sequence[int], t: Sequence[float], bce: Sequence[float]) -> None:
        """``images[k]``: the training image of patch k, drawn at flow time ``t[k]`` with loss ``bce[k]``."""
        images, t, bce = np.asarray(images, int), np.asarray(t, float), np.asarray(bce, float)
        b = np.minimum((t * len(self.bin_mean)).astype(int), len(self.bin_mean) - 1)
        m = self.bin_mean[b]  # relative to the mean BCE at this t *before* this batch joins it
        rel = np.where(np.isfinite(m), bce / np.maximum(np.nan_to_num(m, nan=1.0), 1e-8), 1.0)
        for j in range(len(self.bin_mean)):
            sel = bce[b == j]
            if sel.size:
                m = self.bin_mean[j]
                self.bin_mean[j] = sel.mean() if not np.isfinite(m) else \
                    self.bin_decay * m + (1 - self.bin_decay) * sel.mean()
        for i in np.unique(images):
            self.difficulty[i] = self.decay * self.difficulty[i] + (1 - self.decay) * rel[images == i].mean()

    def state_dict(self) -> dict:
        return {"difficulty": self.difficulty.tolist(), "bin_mean": self.bin_mean.tolist()}

    def load_state_dict(self, st: dict) -> None:
        d = np.asarray(st["difficulty"], dtype=np.float64)
        if d.shape != (self.n,):
            raise ResumeError(f"the saved hard-image sampler knows {d.size} training images; this run has {self.n}")
        self.difficulty = d
        self.bin_mean = np.asarray(st["bin_mean"], dtype=np.float64)


def items_digest(items: Sequence[dict]) -> dict:
    """``{"n", "digest"}`` of a run's training or validation items, in order (the order decides which image each
    draw takes): every key of every entry, files by their names (a run folder may move with its data)."""
    import hashlib

    def plain(k, v):
        if k in ("image", "label"):
            return [Path(str(x)).name for x in v] if isinstance(v, (list, tuple)) else Path(str(v)).name
        return v

    rows = [{k: plain(k, v) for k, v in sorted(it.items())} for it in items]
    h = hashlib.sha256(json.dumps(rows, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return {"n": len(rows), "digest": h}


def _without_fingerprint(d: dict, path_too: bool = False) -> dict:
    """Hyper-parameters without ``vlm.fingerprint`` (compared with a tolerance, not for equality) and, with
    ``path_too`` (both runs' fingerprints known and agreeing), without the VLM's folder: the same weights moved."""
    d = dict(d)
    if isinstance(d.get("vlm"), dict):
        drop = ("fingerprint", "name_or_path") if path_too else ("fingerprint",)
        d["vlm"] = {k: v for k, v in d["vlm"].items() if k not in drop}
    return d


def load_train_state(path: str | os.PathLike) -> dict:
    """The training state ``lib.training.train`` writes for ``--resume`` (tensors and plain values only)."""
    path = Path(path)
    if not path.exists():
        raise ResumeError(f"nothing to resume: {path} does not exist (it is written at each validation and every "
                          f"train.state_every_s seconds)")
    try:
        st = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise ResumeError(f"cannot read the training state {path}: {type(e).__name__}: {e}") from e
    if not isinstance(st, dict) or st.get("format") != STATE_FORMAT:
        raise ResumeError(f"{path} is not a training state written by lib.training.train")
    return st


def _best_on_disk(path: Path) -> dict | None:
    """``{"dice", "iteration", "summary"}`` of the validation that wrote ``best.pt``, or None."""
    if not path.exists():
        return None
    try:
        metrics = torch.load(path, map_location="cpu", weights_only=True).get("metrics") or {}
        dice = float(metrics["val"]["dice"]["mean"])
    except Exception:  # noqa: BLE001 - an unreadable or foreign best.pt: the state decides
        return None
    if not math.isfinite(dice):
        return None
    return {"dice": dice, "iteration": metrics.get("iteration"), "summary": metrics.get("val")}


def _init_distributed(device: torch.device, timeout_min: float = DIST_TIMEOUT_MIN) -> tuple[int, int, torch.device]:
    """``(world_size, rank, device)``; under ``torchrun`` (WORLD_SIZE > 1) joins the process group: NCCL with one
    GPU per process (LOCAL_RANK) on CUDA, gloo on the CPU; a collective fails after ``timeout_min`` minutes."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 1, 0, device
    import torch.distributed as dist

    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        # the other ranks wait in a collective while rank 0 validates: PyTorch's default limit (NCCL 10 min, gloo
        # 30 min) ended a run whose validation took longer, after its training, before best.pt was written
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(minutes=timeout_min))
    return dist.get_world_size(), dist.get_rank(), device


def hparams_differences(theirs: dict, ours: dict) -> list[str]:
    """Which settings of two hyper-parameter dicts differ, by ``section.key`` (a section that is no mapping, such as
    ``structures``, by its name: it was named ``structures.None``; a review)."""
    out = set()
    for sec in set(theirs) | set(ours):
        a, b = theirs.get(sec), ours.get(sec)
        if isinstance(a, dict) and isinstance(b, dict):
            out |= {f"{sec}.{k}" for k in set(a) | set(b) if a.get(k) != b.get(k)}
        elif a != b:
            out.add(sec)
    return sorted(out)


def distributed_norm(model: torch.nn.Module, norm: str, device: torch.device, world: int) -> torch.nn.Module:
    """Batch norm under several processes normalised each rank by its own share of the global batch, and DDP copied
    rank 0's running statistics into every rank, so 1 and 2 ranks no longer trained alike (4.6e-2 apart after 6
    steps; instance norm 9.5e-7; a review). On CUDA the batch-norm layers become ``SyncBatchNorm`` (the statistics of
    the whole global batch; the same parameters and state-dict keys, converted in place); gloo has no SyncBatchNorm,
    so the CPU refuses it (ConfigError) -- the one path for ``lib.training.train`` and the MONAI Label trainer."""
    if world <= 1 or norm != "batch":
        return model
    if device.type != "cuda":
        raise ConfigError(f"model.norm 'batch' under {world} processes on the CPU: each would normalise by its own "
                          "share of the batch (SyncBatchNorm needs CUDA); train with model.norm 'instance' or "
                          "'group', or in one process")
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)


def _log_wait(rank: int, val_s_est: float, timeout_min: float) -> None:
    """A rank other than 0 is about to wait for rank 0's validation: say so, and when the wait may outlast the
    process group's timeout (the run would end without its checkpoints), what to do."""
    if val_s_est <= 0:  # a run limited by iterations only measures its first validation as it runs it
        logger.info("rank %d waits for rank 0's validation (not yet timed; timeout %g min, --dist-timeout)", rank,
                    timeout_min)
    elif val_s_est > 0.8 * timeout_min * 60:
        logger.warning("rank %d waits for rank 0's validation (estimated %.0f s) with a distributed timeout of %g "
                       "min: it may time out and end the run; give a larger --dist-timeout", rank, val_s_est,
                       timeout_min)
    else:
        logger.info("rank %d waits for rank 0's validation (estimated %.0f s; timeout %g min, --dist-timeout)", rank,
                    val_s_est, timeout_min)


def _broadcast_clock(elapsed: float, train_s: float, val_s: float, device) -> tuple[float, float, float]:
    """Rank 0's clocks: elapsed wall time, training time and the validation-time estimate (only rank 0 validates;
    every stopping, validation and learning-rate decision reads all three)."""
    clock = torch.tensor([elapsed, train_s, val_s], dtype=torch.float64, device=device)
    torch.distributed.broadcast(clock, 0)
    return float(clock[0]), float(clock[1]), float(clock[2])


def parameter_checksum(model: torch.nn.Module) -> str:
    """Sum and sum of squares of all parameters (float64, exact digits): ranks that trained one model print the
    same string."""
    with torch.no_grad():
        s = sum(float(p.double().sum()) for p in model.parameters())
        q = sum(float(p.double().square().sum()) for p in model.parameters())
    return f"{s!r}/{q!r}"


def weight_average(model: torch.nn.Module, decay: float) -> AveragedModel | None:
    """PyTorch's ``AveragedModel`` as an exponential moving average of ``model``'s weights and buffers, with the
    decay warmed up as ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates; ``None`` when ``decay`` is 0."""
    if not decay:
        return None

    @torch.no_grad()
    def ema(averaged: list[torch.Tensor], current: list[torch.Tensor], n: torch.Tensor) -> None:
        d = min(decay, (1.0 + float(n)) / (10.0 + float(n)))
        floats = [i for i, a in enumerate(averaged) if a.is_floating_point()]
        if floats:
            torch._foreach_lerp_([averaged[i] for i in floats], [current[i] for i in floats], 1.0 - d)
        for a, c in zip(averaged, current):  # integer buffers (batch norm's count) are copied: lerp has none (it
            if not a.is_floating_point():  # raised at the second step with model.norm=batch, a review)
                a.copy_(c)

    return AveragedModel(model, multi_avg_fn=ema, use_buffers=True)


def lr_at(progress: float, base: float, warmup: float = 0.03) -> float:
    if progress < warmup:
        return base * (0.1 + 0.9 * progress / warmup)
    p = min(1.0, (progress - warmup) / (1 - warmup))
    return base * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * p)))


@dataclass
class TrainResult:
    best_checkpoint: str
    last_checkpoint: str
    best_val: dict
    history: list[dict] = field(default_factory=list)
    iterations: int = 0
    train_seconds: float = 0.0
    wall_seconds: float = 0.0


_RUN_LOCKS: dict[str, object] = {}  # OUT folders whose run this process holds (for its lifetime)


def hold_run_lock(out: str | os.PathLike) -> None:
    """One training per ``OUT``: an exclusive ``flock`` on ``OUT/.train.lock``, held until this process ends (the
    kernel drops it at any exit, ``kill -9`` included, so no stale lock is left). Two runs in one folder (a second
    ``--resume`` started beside the first, or torchrun's orphaned ranks after a ``kill -9`` of the launcher) each
    rewrote ``losses.csv``, ``resume.pt`` and the checkpoints, and one deleted the other's temporary files (a
    review); the second is now refused naming the first's process id. Raises ConfigError."""
    import fcntl

    path = Path(out) / ".train.lock"
    key = os.path.realpath(path)
    if key in _RUN_LOCKS:
        return
    f = open(path, "a+")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "?"
        f.close()
        raise ConfigError(f"another training is running in {out} (process {holder}; {path} is locked): wait for it "
                          "to end, or stop it, before training or resuming there") from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    _RUN_LOCKS[key] = f


def train(hp: HParams, train_items: Sequence[dict], val_items: Sequence[dict], out_dir: str | Path,
          device: str | torch.device = "cpu", time_budget_s: float | None = None,
          max_iterations: int | None = None, progress: bool = True,
          on_log: Callable[[dict], None] | None = None, resume: bool = False,
          dist_timeout_min: float = DIST_TIMEOUT_MIN) -> TrainResult:
    """Train; ``out_dir/resume.pt`` (model, optimiser, iteration, schedule clock, every RNG, history) is written
    atomically at each validation and every ``train.state_every_s`` seconds of training (or ``state_every_it``
    iterations); ``resume=True`` continues from it as if never interrupted: the same budget or iteration count, the
    learning-rate schedule where it was, the same random streams, so the loss curve (``losses.csv``, one row per
    iteration) continues the interrupted one. Under torchrun a rank waits at most ``dist_timeout_min`` minutes in
    a collective: the other ranks wait there while rank 0 validates."""
    t_start = time.perf_counter()
    if not train_items or not val_items:  # the CLI's and every script's check (the CLI names no split here)
        raise ConfigError(f"the {'training' if not train_items else 'validation'} split has no images: nothing to "
                          f"{'train on' if not train_items else 'validate (and choose best.pt) on'}")
    for split, items in (("training", train_items), ("validation", val_items)):  # (a raw KeyError after caching)
        unlabelled = [it for it in items if not it.get("label")]
        if unlabelled:
            raise ConfigError(f"the {split} split: {len(unlabelled)} of {len(items)} entries have no label (e.g. "
                              f"{unlabelled[0].get('image')!r}); training and validation need one each")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tc = hp.train
    check_train(tc)  # before anything is loaded: a bad value is refused in a second, not after caching the data
    hp.preprocessing.resolved()  # (the patch centres' pos / neg too)
    budget = float(time_budget_s if time_budget_s is not None else tc.time_budget_s)
    max_it = max_iterations if max_iterations is not None else tc.max_iterations
    if not (math.isfinite(budget) and budget > 0):  # nan never stopped the loop (every comparison False)
        raise ConfigError(f"the time budget must be a finite number of seconds > 0, got {budget!r}")
    if max_it is not None and (isinstance(max_it, bool) or not isinstance(max_it, int) or max_it < 1):
        raise ConfigError(f"max_iterations must be null or an integer >= 1, got {max_it!r}")
    # the clock can end the run: no iteration limit, or a budget given beside one (--minutes and --max-iterations:
    # whichever comes first)
    time_limited = max_it is None or time_budget_s is not None
    if tc.num_threads:
        torch.set_num_threads(tc.num_threads)
    torch.manual_seed(tc.seed)
    np_rng = np.random.default_rng(tc.seed)  # which images make each global batch: the same stream on every rank
    if not (isinstance(dist_timeout_min, (int, float)) and 0 < dist_timeout_min < math.inf):
        raise ConfigError(f"the distributed timeout must be a number of minutes > 0, got {dist_timeout_min!r}")
    world, rank, device = _init_distributed(torch.device(device), dist_timeout_min)
    main_rank = rank == 0
    if main_rank:
        hold_run_lock(out)  # before anything in OUT is touched (the next line deletes temporary files)
    if main_rank:  # half-written files of a run killed during a write
        for f in remove_interrupted_writes(out, ("best.pt", "last.pt", "resume.pt", "losses.csv")):
            logger.info("removed %s, left by an interrupted write", f)
    distributed_norm(torch.nn.Module(), hp.model.norm, device, world)  # refused before anything is loaded
    n_img = min(tc.images_per_batch, len(train_items))
    if world > 1 and n_img % world:
        raise ConfigError(f"train.images_per_batch ({n_img}, at most the {len(train_items)} training images) is the "
                          f"global batch: it must be a multiple of the number of ranks ({world})")

    system = build_system(hp, device)
    hp = system.hparams
    # "auto" is resolved HERE and recorded: a model is served in the precision it was trained in (an fp32-trained
    # cxr model scored Dice 0.76 instead of 0.956 under bf16 inference on an AVX512-BF16 CPU)
    hp.precision = precision_policy.recorded(hp.precision, device)
    model = system.model = distributed_norm(system.model, hp.model.norm, device, world)
    machine = precision_policy.describe(hp.precision, device)
    if world > 1:
        machine["distributed"] = {"world_size": world, "backend": torch.distributed.get_backend()}
    logger.info("model: %s parameters (arch %s), FiLM stages %s, VLM %s (%s-d); precision %s -> %s on %s (CPU %s)",
                sum(p.numel() for p in model.parameters()), hp.model.arch, model.vlm_film_decoder_stages,
                hp.vlm.name_or_path if system.vlm else None, hp.model.cond_dim, hp.precision, machine["dtype"],
                device, machine["cpu_capability"])

    train_ds = CacheDataset(list(train_items), transform=system.preprocessing, progress=progress, num_workers=0)
    val_pre = [system.preprocessing({k: v for k, v in it.items() if k in ("image", "text", "case_id")})
               for it in val_items]
    lab_t = system.label_reader()  # evaluate's
    val_lab = [lab_t(label_item(it)) for it in val_items]
    check_labels(val_items, val_lab)  # before training: a label off its image's size refused, one read empty logged
    labels = (train_ds[i].get("label") for i in range(len(train_ds)))  # each cached item read (copied) once
    empty = [i for i, lab in enumerate(labels) if lab is not None and not bool((lab > 0).any())]
    if main_rank and empty:  # a wrong label_threshold (or label files) shows here, not as a Dice of 0 at the end
        msg = (f"{len(empty)} of {len(train_ds)} training labels have no foreground after preprocessing "
               f"(preprocessing.label_threshold {hp.preprocessing.label_threshold!r})")
        if len(empty) == len(train_ds):
            logger.warning("%s: the model can only learn to answer background", msg)
        else:
            logger.info(msg)
    inferer = make_inferer(system)

    batcher = PatchBatcher(hp.preprocessing, tc.patches_per_image, augment=tc.augment, seed=tc.seed,
                           augmentation=tc.augmentation, structures=hp.structures)
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    averaged = weight_average(model, tc.ema_decay)
    hard = HardImageSampler(len(train_ds), tc.hard_share, tc.hard_decay)
    best = {"dice": -1.0}
    history: list[dict] = []
    best_path, last_path, state_path = out / "best.pt", out / "last.pt", out / "resume.pt"
    it = 0
    train_s = 0.0
    val_s_est = 0.0
    next_val = tc.val_every_s
    loop_start = None  # elapsed seconds at the first iteration: start-up (VLM, caching) is not training time
    validated_at = -1  # the iteration of the last validation (a finished run resumed does not validate again)
    losses: list[float] = []
    data = {"training": items_digest(train_items), "validation": items_digest(val_items)}
    if resume:
        st = load_train_state(state_path)
        recorded = (st["hyper_parameters"].get("vlm") or {}).get("fingerprint")
        why = fingerprint_mismatch(recorded, hp.vlm.fingerprint)
        if why:
            raise ResumeError(f"{state_path} was written with another VLM than {hp.vlm.name_or_path!r} ({why}); "
                              f"resume with the interrupted run's VLM, or train into a new --out")
        # the same VLM in another folder (another node, a moved model cache) resumes: its fingerprint says it is
        moved = bool(recorded and hp.vlm.fingerprint)
        theirs, ours = _without_fingerprint(st["hyper_parameters"], moved), _without_fingerprint(hp.to_dict(), moved)
        if theirs != ours:
            diff = hparams_differences(theirs, ours)
            raise ResumeError(f"{state_path} was written for other hyper-parameters (differ: {', '.join(diff)}); "
                              f"resume with the same preset and --set options, or train into a new --out")
        if (st["budget_s"], st["max_iterations"]) != (budget, max_it):
            def asked(b, m, limited):  # as the command gave it (a preset's budget unused by --max-iterations alone
                if limited is False:   # was named "budget 2400.0 s": a review)
                    return f"--max-iterations {m} (no --minutes)"
                if limited is None:  # a state from before it recorded which limits were given
                    return f"a budget of {b} s and max_iterations {m}"
                return f"a time budget of {b:g} s" + (f" and --max-iterations {m}" if m is not None else "")

            before, now = asked(st["budget_s"], st["max_iterations"], st.get("time_limited")), \
                asked(budget, max_it, time_limited)
            raise ResumeError(f"{state_path} belongs to a run of {before}; this command asks for {now}: resume with "
                              f"the interrupted command's --minutes / --max-iterations")
        for split, saved in (st.get("data") or {}).items():  # states from before the digest: not checked
            now = data.get(split)
            if now is not None and saved != now:
                raise ResumeError(f"{state_path} belongs to a run with other {split} images ({saved['n']} images, "
                                  f"digest {saved['digest']}; this command has {now['n']}, digest {now['digest']}): "
                                  f"resume with the interrupted command's datalist, splits and --limit-train / "
                                  f"--limit-val, or train into a new --out")
        model.load_state_dict(st["model"])
        if averaged is not None:
            averaged.load_state_dict(st["averaged"])
        opt.load_state_dict(st["optimizer"])
        it, train_s, next_val, val_s_est = st["iteration"], st["train_seconds"], st["next_val"], st["val_seconds"]
        losses, history, best = list(st["losses"]), list(st["history"]), dict(st["best"])
        # a state from before loop_start was recorded: 0, the schedule it ran (restarting it would warm up again)
        loop_start, validated_at = st.get("loop_start", 0.0), st.get("validated_at", -1)
        t_start -= st["elapsed_seconds"]  # this process's start-up (VLM, caching) counts against the budget too
        torch.set_rng_state(st["torch_rng"])
        if device.type == "cuda" and st.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(st["cuda_rng"], device)
        np_rng.bit_generator.state = st["numpy_rng"]
        if st.get("hard_images") is not None:
            hard.load_state_dict(st["hard_images"])
        # a kill between writing best.pt and resume.pt leaves a state whose best is older than best.pt: a later,
        # worse validation would then replace the better best.pt. The best on disk counts
        on_disk = _best_on_disk(best_path)
        if on_disk is not None and on_disk["dice"] > best["dice"]:
            logger.info("best.pt (Dice %.4f at iteration %s) is newer than the state's best (%.4f): kept as the best",
                        on_disk["dice"], on_disk.get("iteration"), best["dice"])
            best = on_disk
        logger.info("resumed %s at iteration %d (%.0f s of training, best Dice %.4f)", state_path, it, train_s,
                    best["dice"])
    if main_rank:  # after the resume checks: a refused --resume wrote its rejected settings into the run (a review)
        (out / "hparams.json").write_text(json.dumps(hp.to_dict(), indent=2))
        (out / "machine.json").write_text(json.dumps(machine, indent=1))
    loss_log = out / "losses.csv"
    rows = loss_log.read_text().splitlines()[1:] if (resume and loss_log.exists()) else []
    loss_f = None
    if main_rank:
        # iterations after the saved state were lost with the interrupted run: the curve continues from the state.
        # A kill -9 can cut the file inside a row ("1" of "15,0.53"): only whole rows of iterations 1..it are kept
        kept = {}
        for r in rows:
            m = _LOSS_ROW.fullmatch(r)
            if m and 1 <= int(m.group(1)) <= it:
                kept[int(m.group(1))] = r
        text = "".join(f"{r}\n" for r in ["iteration,loss"] + [kept[k] for k in sorted(kept)])
        atomic_write(loss_log, lambda f: f.write(text.encode()))
        loss_f = loss_log.open("a")
    network = None
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        # the same wrapping as MONAI Label's multi-GPU trainer: train_loss conditions through system.condition and
        # runs the wrapped model; DDP averages the gradients of all ranks
        network = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    next_state_s = train_s + tc.state_every_s
    kill_at = int(os.environ.get("DFM_TEST_SIGKILL_AT_ITERATION", "0") or 0)
    patches_seen, first_it = 0, it  # it: where a resumed run starts

    def save_state() -> None:
        nonlocal next_state_s
        next_state_s = train_s + tc.state_every_s
        if not main_rank:
            return
        loss_f.flush()
        st = {"format": STATE_FORMAT, "hyper_parameters": hp.to_dict(), "budget_s": budget, "max_iterations": max_it,
              "time_limited": time_limited, "data": data,
              "iteration": it, "train_seconds": train_s, "next_val": next_val, "val_seconds": val_s_est,
              "loop_start": loop_start, "validated_at": validated_at,
              "elapsed_seconds": time.perf_counter() - t_start, "losses": losses[-200:], "history": history,
              "best": {k: v for k, v in best.items() if k != "cases"},
              "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
              "averaged": averaged.state_dict() if averaged is not None else None,
              "optimizer": opt.state_dict(), "torch_rng": torch.get_rng_state(),
              "numpy_rng": np_rng.bit_generator.state,
              "hard_images": hard.state_dict() if tc.hard_share else None,
              "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}
        atomic_torch_save(st, state_path)

    bar = None
    if progress and main_rank:
        from tqdm.auto import tqdm

        bar = tqdm(total=max_it or int(budget), unit="it" if max_it else "s", desc="train")

    def validate(final: bool) -> None:
        nonlocal best, val_s_est, validated_at
        validated_at = it
        if not main_rank:  # validation and checkpoints: rank 0 (the others wait at the next collective)
            save_state()
            return
        v0 = time.perf_counter()
        served = averaged.module if averaged is not None else model  # what the checkpoints hold and the app serves
        system.model = served
        try:
            cases, summ = evaluate_items(system, val_items, inferer, preprocessed=val_pre, labels=val_lab)
        finally:
            system.model = model
        val_s_est = time.perf_counter() - v0
        dice = summ.get("dice", {}).get("mean", float("nan"))
        rec = {"iteration": it, "train_seconds": round(train_s, 1), "wall_seconds": round(time.perf_counter() - t_start, 1),
               "loss": float(np.mean(losses[-200:])) if losses else None, "val_dice": dice,
               "val_hd95": summ.get("hd95", {}).get("mean"), "val_seconds": round(val_s_est, 1), "final": final}
        history.append(rec)
        metrics = {"val": summ, "iteration": it, "train_seconds": train_s}
        save_checkpoint(last_path, served, hp, metrics=metrics)
        if dice > best["dice"]:
            best = {"dice": dice, "iteration": it, "summary": summ, "cases": cases}
            save_checkpoint(best_path, served, hp, metrics=metrics)
            (out / "best_val_cases.json").write_text(json.dumps(cases, indent=1))
        (out / "history.json").write_text(json.dumps(history, indent=1))
        if tc.hard_share:
            ids = [str(t.get("case_id", k)) for k, t in enumerate(train_items)]
            (out / "hard_images.json").write_text(json.dumps(
                dict(sorted(zip(ids, np.round(hard.difficulty, 4).tolist()), key=lambda kv: -kv[1])), indent=0))
        save_state()
        logger.info("validation @%d: Dice %.4f (best %.4f @%d), %.0f s", it, dice, best["dice"],
                    best.get("iteration", -1), val_s_est)
        if on_log:
            on_log(rec)

    if main_rank and val_s_est == 0.0 and time_limited:
        # until a validation measures itself: one validation image's time x their number, so that a budget that
        # ends before the first periodic validation keeps the time of its final one (it overran by one validation)
        # the second image's time when there are two: the first call pays the one-off start (kernel selection,
        # caches: 6.2 s against 0.37 s for the next under AVX2 dispatch), which made the estimate 17x too long --
        # and a budget shorter than it ended before the first training iteration
        took = []
        for k in range(min(2, len(val_items))):
            v0 = time.perf_counter()
            evaluate_items(system, val_items[k:k + 1], inferer, preprocessed=val_pre[k:k + 1],
                           labels=val_lab[k:k + 1])
            took.append(time.perf_counter() - v0)
        val_s_est = took[-1] * len(val_items)
        logger.info("validation estimated at %.0f s (%d images; %s s for the first %d)", val_s_est, len(val_items),
                    " and ".join(f"{t:.2f}" for t in took), len(took))
    model.train()
    while True:
        elapsed = time.perf_counter() - t_start
        if world > 1:  # every rank follows rank 0's clock: the same schedule, validations and stopping point
            elapsed, train_s, val_s_est = _broadcast_clock(elapsed, train_s, val_s_est, device)
        if it > 0 and (max_it is None or it < max_it):
            if train_s >= next_val:
                next_val = train_s + tc.val_every_s
                # a time budget that would end within a few iterations after this validation (the loop stops once
                # the time left is under 1.1 validations): the final validation stands in for it, and its time goes
                # to training (every 42-minute run validated twice at its end, one iteration apart, over budget)
                if not time_limited or elapsed + 2.1 * max(val_s_est, 1.0) + 5 * train_s / it < budget:
                    if world > 1 and not main_rank:
                        _log_wait(rank, val_s_est, dist_timeout_min)
                    validate(final=False)
                    if world > 1:  # rank 0 measured the validation: every rank stops and schedules with it
                        elapsed, train_s, val_s_est = _broadcast_clock(elapsed, train_s, val_s_est, device)
            elif train_s >= next_state_s or (tc.state_every_it and it % tc.state_every_it == 0):
                save_state()
        if max_it is not None and it >= max_it:
            break
        # a time budget holds with an iteration limit too when it was given (--minutes): whichever comes first
        if time_limited and elapsed + max(val_s_est, 1.0) * 1.1 >= budget:
            break
        if loop_start is None:
            loop_start = elapsed
        # the schedule's progress: iterations done, or the training time spent of what the budget leaves after
        # start-up and the final validation, whichever is further (with both limits the clock may end the run
        # first: its learning rate still decays)
        progress_frac = max(it / max_it if max_it else 0.0,
                            min(1.0, (elapsed - loop_start) / max(1.0, budget - loop_start - val_s_est))
                            if time_limited else 0.0)
        for g in opt.param_groups:
            g["lr"] = lr_at(progress_frac, tc.lr)
        s0 = time.perf_counter()
        idx = hard.draw(np_rng, n_img)
        # rank r takes slots r, r + world, ... of the global batch; every slot's patches, augmentations, t and x_t
        # come from streams keyed by (seed, iteration, slot): the same whatever the number of ranks
        slots = list(range(n_img))[rank::world]
        batch = batcher([train_ds[int(idx[k])] for k in slots],
                        seeds=[derive_seed(tc.seed, "patches", it, k) for k in slots])
        per_item = len(batch["image"]) // max(1, len(slots))
        noise = ItemNoise([derive_seed(tc.seed, "flow", it, k, j) for k in slots for j in range(per_item)],
                          device=device)
        info: dict | None = {} if tc.hard_share else None
        # simulated clicks (click-trained models): the batch's draws keyed by (seed, iteration), each patch's by its
        # slot too (keyed by rank, a click-trained run depended on the number of processes)
        clicks = system.takes_clicks  # (no streams made per iteration for a model without clicks)
        loss = train_loss(system, batch, device, generator=noise, network=network,
                          rng=np.random.default_rng(derive_seed(tc.seed, "clicks", it)) if clicks else None,
                          info=info, item_rngs=[np.random.default_rng(derive_seed(tc.seed, "clicks", it, k, j))
                                                for k in slots for j in range(per_item)] if clicks else None)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if averaged is not None:
            averaged.update_parameters(model)
        if info is not None:
            # every rank's patches (slot k of the global batch = image idx[k]): all ranks keep the same sampler
            t_k = torch.zeros(n_img, per_item, device=device)
            bce_k = torch.zeros(n_img, per_item, device=device)
            t_k[slots] = info["t"].float().view(len(slots), per_item)
            bce_k[slots] = info["item_bce"].float().view(len(slots), per_item)
            if world > 1:
                torch.distributed.all_reduce(t_k)
                torch.distributed.all_reduce(bce_k)
            hard.update(np.repeat(idx, per_item), t_k.flatten().cpu().numpy(), bce_k.flatten().cpu().numpy())
        train_s += time.perf_counter() - s0
        loss_value = float(loss)
        if world > 1:
            lt = torch.tensor([loss_value], device=device)
            torch.distributed.all_reduce(lt)
            loss_value = float(lt) / world
        if not math.isfinite(loss_value):  # (every rank sees the same mean: all stop together)
            # the run went on with NaN weights and published them as last.pt (a review, 2026-12-08)
            raise TrainingDiverged(f"the training loss is {loss_value} at iteration {it + 1} (learning rate "
                                   f"{opt.param_groups[0]['lr']:.3g}): training stopped; the checkpoints written "
                                   "before it are kept. Lower train.lr (or train.autocast) and train again")
        losses.append(loss_value)
        patches_seen += len(batch["image"])
        it += 1
        if loss_f is not None:
            loss_f.write(f"{it},{loss_value:.6f}\n")
        if it == kill_at:  # tests: a real kill -9 at a known iteration (buffered loss rows die with it)
            os.kill(os.getpid(), signal.SIGKILL)
        if bar is not None:
            if max_it:
                bar.update(1)
            else:
                bar.n = int(time.perf_counter() - t_start)
                bar.refresh()
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}", it=it)
    logger.info("rank %d of %d: %d patches in this process's %d iterations (%d in all)", rank, world, patches_seen,
                it - first_it, it)
    if world > 1:
        logger.info("rank %d of %d: parameter checksum %s", rank, world, parameter_checksum(model))
    if it == 0:  # a budget spent before the first step: no best.pt of random weights, no exit 0 that looks trained
        if loss_f is not None:
            loss_f.close()
        raise ConfigError(f"the time budget ({budget:.0f} s) ended before the first training iteration (start-up "
                          f"took {time.perf_counter() - t_start:.0f} s): give more --minutes")
    if validated_at != it:  # the budget often ends right after a periodic validation: not twice in a row
        if world > 1 and not main_rank:
            _log_wait(rank, val_s_est, dist_timeout_min)
        validate(final=True)
    if loss_f is not None:
        loss_f.close()
    if world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    if bar is not None:
        bar.close()
    wall = time.perf_counter() - t_start
    res = TrainResult(best_checkpoint=str(best_path), last_checkpoint=str(last_path),
                      best_val={k: v for k, v in best.items() if k != "cases"}, history=history, iterations=it,
                      train_seconds=train_s, wall_seconds=wall)
    if main_rank:  # every rank wrote it: another rank's empty result, or two texts overlapping (a review)
        text = json.dumps(res.__dict__, indent=1, default=str)
        atomic_write(out / "train_result.json", lambda f: f.write(text.encode()))
    return res
